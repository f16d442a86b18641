"""Entry point: ``python -m lightning_idrs {fit,validate,test,certify,thresholds} ...``."""
import sys


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    command = argv[0] if argv else None
    if command == "thresholds":
        from lightning_idrs.thresholds import main as thresholds_main

        return thresholds_main(argv[1:])
    if command == "certify":
        from lightning_idrs.certify import main as certify_main

        return certify_main(argv[1:])
    from lightning_idrs.cli import cli_main

    cli_main(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
