"""Train (or resume) the embedded reference DiT. Same as `taylorseer train-reference`."""

from taylorseer.cli import main

if __name__ == "__main__":
    main(["train-reference"])
