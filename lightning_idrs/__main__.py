"""Entry point: ``python -m lightning_idrs {fit,validate,test,certify,thresholds,doctor} ...``."""
import sys

from lightning_idrs.commands import main

if __name__ == "__main__":
    sys.exit(main())
