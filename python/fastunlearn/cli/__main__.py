"""python -m fastunlearn.cli: the fastunlearn command."""

from fastunlearn.cli.main import main

if __name__ == "__main__":
    main()
