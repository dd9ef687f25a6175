"""`python -m tools.vmmctl`: run vmmctl."""

from tools.vmmctl.cli import main

if __name__ == "__main__":
    main()
