from lit_fewstep.cli import main

if __name__ == "__main__":
    main()
