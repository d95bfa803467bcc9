"""lit_fewstep: a PyTorch Lightning zoo of few-step diffusion generation.

Layers (floors), bottom to top; a module imports only from its own floor or the floors below it, at module level
and inside functions alike (`tests/test_layering.py` checks every module):

0. ``utils``, ``conditioning`` (and this package's ``__init__``): checkpoints, config resolution, argument types,
   pictures; the `Conditioning` structure that data, nets, methods and samplers all carry.
1. ``diffusion``, ``nets``, ``data``, ``metrics``: building blocks; they know nothing of training methods.
   ``data.pairs`` makes pairs from a teacher *object*; loading one from a checkpoint is the CLI's ``pairs``.
2. ``methods``: the LightningModules, and ``methods.sampling`` (load a checkpoint for sampling, ``draw``).
3. ``evaluation`` (the ``evaluate`` command, ``Evaluator``) and ``callbacks`` (training callbacks that sample
   a method and score it with the ``Evaluator``).
4. ``cli`` and ``__main__``: the top floor; nothing else imports them.

Two things are not imports in this sense: code under ``if __name__ == "__main__":`` (a script entry point such as
``python -m lit_fewstep.data.pairs``, which forwards to the CLI), and the one lazy alias
``lit_fewstep.metrics.<Callback>`` (``metrics.__getattr__`` imports ``lit_fewstep.callbacks`` on first use, because
configs name the callbacks there; importing ``lit_fewstep.metrics`` never imports the methods).
"""

__version__ = "0.1.0"
