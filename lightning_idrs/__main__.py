"""Entry point: ``python -m lightning_idrs {fit,validate,test,certify,thresholds} ...``."""
import sys

USAGE = """usage: python -m lightning_idrs COMMAND [options]

commands:
  fit          train a base classifier under input-dependent Gaussian noise (LightningCLI)
  validate     evaluate a checkpoint on the validation set (LightningCLI)
  test         evaluate a checkpoint on the test set (LightningCLI)
  certify      certify a checkpoint: certified radius per point, summary, curve
  thresholds   the curse-of-dimensionality thresholds of sigma1/sigma0 (Thm. 2.4)

'python -m lightning_idrs COMMAND --help' lists the options of a command.
"""


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    command = argv[0] if argv else None
    if command in (None, "-h", "--help"):
        print(USAGE, file=sys.stdout if command else sys.stderr)
        return 0 if command else 2
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
