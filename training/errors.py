"""The two ways a training run ends early on purpose, and the exit code each gives.

Exit codes: 0 done; 1 Hub repository creation or upload failed (the local output is complete); 2 bad command
line or input; 130 stopped by Ctrl-C / SIGTERM (after saving a checkpoint).

Under a multi-process launch every process meets the same bad input and exits with its code, but only the main
process prints the `error:` line: one message, not one per GPU.
"""

import os
import sys
from contextlib import contextmanager

HUB_FAILED_EXIT_CODE = 1
BAD_INPUT_EXIT_CODE = 2  # also argparse's code for a bad command line
INTERRUPTED_EXIT_CODE = 130


class InputError(ValueError):
    """A bad training input (image, folder, checkpoint, model), reported before any training work."""


@contextmanager
def loading(flag: str, name: str):
    """Turn a failure to load the model that `flag` names (missing files, an unknown repo id, a wrong revision or
    variant) into an `InputError` naming the flag."""
    try:
        yield
    except (OSError, ValueError) as error:
        first_line = next(iter(str(error).splitlines()), type(error).__name__)
        raise InputError(f"{flag}: cannot load {name}: {first_line}") from None


class HubError(RuntimeError):
    """Creating the Hub repository or uploading to it failed."""


def is_main_process() -> bool:
    """Whether this is the main process of the launch: accelerate's answer once its state exists, else the global
    rank that torchrun, `accelerate launch` and MPI put in the environment (a plain `python` run has none)."""
    from accelerate.state import PartialState  # imported here, as the plugin's errors below

    if PartialState._shared_state:
        return PartialState().is_main_process
    for variable in ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK"):
        if os.environ.get(variable, "").strip().isdigit():
            return int(os.environ[variable]) == 0
    return True


def print_error(message: str) -> None:
    """`error: message` on stderr, from the main process only."""
    if is_main_process():
        print(f"error: {message}", file=sys.stderr)


def run_with_exit_codes(main, args) -> None:
    """Run a script's `main(args)`, turning the errors above into a message and their exit code."""
    # Imported here: the evaluation reads images through `training.images`, which imports this module, and must
    # not need the plugin's diffusers and accelerate stack for it.
    from pipelines.tlora import TLoraConfigError, TLoraFileError, TLoraInjectionError

    try:
        main(args)
    except (InputError, TLoraConfigError, TLoraFileError, TLoraInjectionError) as error:
        # the plugin's errors can only come from what the user gave: settings, files, the base model
        print_error(str(error))
        raise SystemExit(BAD_INPUT_EXIT_CODE) from None
    except HubError as error:
        print_error(str(error))
        raise SystemExit(HUB_FAILED_EXIT_CODE) from None
