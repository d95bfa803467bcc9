import sys

from lit_fewstep.cli import console

if __name__ == "__main__":
    sys.exit(console())
