"""`moss-speech push`: upload a directory to the Hub with remote code and a model card."""

from __future__ import annotations

import argparse
from pathlib import Path

from ...hub.publish import CARD_TEMPLATES, publish, stage_upload
from .common import (
    CODEC_MODEL_TYPE,
    LM_MODEL_TYPE,
    CLIError,
    CommandFactory,
    _check_checkpoint,
    _check_dir,
    _note,
    _read_config,
)


def add_parser(command: CommandFactory) -> None:
    """Add `push` to the sub-commands (`command` makes a sub-parser with the global options)."""
    push = command(
        "push", "upload a model or codec directory to the Hugging Face Hub with remote code and a model card",
        "Upload DIR to the Hub repository REPO_ID in one commit: weights, processor, the codec (--codec: as the "
        "codec/ folder of the same repository; --codec-repo: a codec published on its own, referenced by the "
        "processor), code files with auto_map (so that trust_remote_code=True works without this package) and a "
        "README.md model card from model_cards/ with Hub metadata. The token is the logged-in user's or $HF_TOKEN.",
        "push moss-speech-hf your-name/MOSS-Speech",
        "push moss-speech-codec-hf your-name/MOSS-Speech-Codec --card codec",
        "push nano-out your-name/MOSS-Speech-Nano --card nano --codec nano-codec --private",
        "push moss-speech-hf your-name/MOSS-Speech --dry-run staged/")
    push.add_argument("directory", metavar="DIR", help="converted or saved model directory (or a codec directory)")
    push.add_argument("repo_id", metavar="REPO_ID", help="Hub repository 'namespace/name', created if needed")
    where = push.add_mutually_exclusive_group()
    where.add_argument("--codec", metavar="DIR", help="codec directory uploaded as the repository's codec/ folder")
    where.add_argument("--codec-repo", metavar="REPO_ID",
                       help="repository of a codec published on its own, for the processor to load")
    push.add_argument("--card", choices=sorted(CARD_TEMPLATES),
                      help="model card template (default: codec for a codec directory, moss-speech otherwise)")
    push.add_argument("--base-model", metavar="REPO_ID", help="base_model metadata (default for the moss-speech "
                                                              "card: Qwen/Qwen3-8B)")
    push.add_argument("--dataset", action="append", default=[], metavar="REPO_ID",
                      help="a Hub dataset the model was trained on (datasets metadata; repeatable)")
    push.add_argument("--tag", action="append", default=[], metavar="TAG", help="an extra tag (repeatable)")
    push.add_argument("--private", action="store_true", help="create the repository as private")
    push.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing to main")
    push.add_argument("--revision", metavar="BRANCH", help="branch to commit to (default: main)")
    push.add_argument("--commit-message", metavar="TEXT", default="Upload MOSS-Speech checkpoint with moss-speech",
                      help="message of the upload commit")
    push.add_argument("--no-remote-code", action="store_true",
                      help="do not add code files and auto_map (then only users of this package can load it)")
    push.add_argument("--dry-run", metavar="DIR",
                      help="write what would be uploaded (weights as links) to the new directory DIR, print the file "
                           "list and upload nothing")
    push.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """`moss-speech push`: stage and upload a directory (or, with --dry-run, only stage it)."""
    directory = _check_dir(args.directory, "push")
    config = _read_config(directory)
    if config is None or config.get("model_type") not in (LM_MODEL_TYPE, CODEC_MODEL_TYPE):
        raise CLIError(f"push: {args.directory!r} is not a MOSS-Speech model or codec directory (config.json with "
                       f"model_type {LM_MODEL_TYPE!r} or {CODEC_MODEL_TYPE!r})")
    if args.codec is not None:
        _check_checkpoint(args.codec, "--codec", CODEC_MODEL_TYPE)
    card = args.card or ("codec" if config["model_type"] == CODEC_MODEL_TYPE else "moss-speech")
    options = {"card": card, "codec_dir": args.codec, "codec_repo_id": args.codec_repo,
               "remote_code": not args.no_remote_code, "base_model": args.base_model,
               "datasets": args.dataset or None, "tags": args.tag or None}
    if args.dry_run is not None:
        stage = Path(args.dry_run)
        if stage.exists() and (not stage.is_dir() or any(stage.iterdir())):
            raise CLIError(f"--dry-run: {args.dry_run!r} must be a new or empty directory")
        files = stage_upload(directory, stage, args.repo_id, **options)
        print("\n".join(files))
        _note(f"dry run: {len(files)} files staged in {stage} for {args.repo_id}; nothing uploaded")
        return 0
    info = publish(directory, args.repo_id, private=args.private, commit_message=args.commit_message,
                   create_pr=args.create_pr, revision=args.revision, **options)
    print(getattr(info, "pr_url", None) or getattr(info, "commit_url", None) or info)
    _note(f"uploaded {directory} to {args.repo_id}")
    return 0
