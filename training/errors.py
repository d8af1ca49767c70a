"""The two ways a training run ends early on purpose, and the exit code each gives.

Exit codes: 0 done; 1 Hub repository creation or upload failed (the local output is complete); 2 bad command
line or input; 130 stopped by Ctrl-C / SIGTERM (after saving a checkpoint).
"""

import sys

HUB_FAILED_EXIT_CODE = 1
BAD_INPUT_EXIT_CODE = 2  # also argparse's code for a bad command line
INTERRUPTED_EXIT_CODE = 130


class InputError(ValueError):
    """A bad training input (image, folder, checkpoint, model), reported before any training work."""


class HubError(RuntimeError):
    """Creating the Hub repository or uploading to it failed."""


def run_with_exit_codes(main, args) -> None:
    """Run a script's `main(args)`, turning the errors above into a message and their exit code."""
    # Imported here: the evaluation reads images through `training.images`, which imports this module, and must
    # not need the plugin's diffusers and accelerate stack for it.
    from pipelines.tlora import TLoraConfigError, TLoraFileError, TLoraInjectionError

    try:
        main(args)
    except (InputError, TLoraConfigError, TLoraFileError, TLoraInjectionError) as error:
        # the plugin's errors can only come from what the user gave: settings, files, the base model
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(BAD_INPUT_EXIT_CODE) from None
    except HubError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(HUB_FAILED_EXIT_CODE) from None
