"""`python -m tools.guests`: build the test guests and print their paths."""

import sys

from tools.guests.images import main

if __name__ == "__main__":
    sys.exit(main())
