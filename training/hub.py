"""Publishing the result: the Hub repository is created before training (a bad name or token fails in
seconds, not after hours), and the output folder is uploaded at the end without checkpoints. A failed upload
keeps every local file and says how to upload them later."""

from __future__ import annotations

from pathlib import Path

from accelerate.logging import get_logger
from huggingface_hub import create_repo, upload_folder

from .errors import HubError

logger = get_logger(__name__)

UPLOAD_IGNORE_PATTERNS = ["checkpoint-*/**", "checkpoint-*", "*.tmp"]


def create_hub_repo(args) -> str:
    name = args.hub_model_id or Path(args.output_dir).resolve().name
    try:
        return create_repo(repo_id=name, exist_ok=True, token=args.hub_token).repo_id
    except Exception as error:  # network, authentication or naming problems all end the run the same way
        raise HubError(f"Could not create the Hub repository {name!r}: {error}") from error


def push_to_hub(args, repo_id: str) -> None:
    try:
        upload_folder(
            repo_id=repo_id,
            folder_path=args.output_dir,
            commit_message="End of training",
            ignore_patterns=UPLOAD_IGNORE_PATTERNS,
            token=args.hub_token,
        )
    except Exception as error:
        raise HubError(
            f"Upload to the Hub repository {repo_id} failed: {error}. The trained adapter is complete in "
            f"{args.output_dir}; upload it later with: hf upload {repo_id} {args.output_dir} --exclude 'checkpoint-*'"
        ) from error
    logger.info(f"Uploaded {args.output_dir} to https://huggingface.co/{repo_id}")
