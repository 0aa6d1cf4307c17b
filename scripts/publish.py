#!/usr/bin/env python
"""Publish a trained output folder to the Hugging Face Hub (or a Hub-compatible server) or a git remote.

    python scripts/publish.py OUTPUT_DIR REPO_ID [--hub-endpoint URL] [--private] [--revision REV]
                              [--commit-message MSG] [--include-checkpoints] [--allow-unfinished]
    python scripts/publish.py OUTPUT_DIR --push-to-git URL [--revision BRANCH] ...

OUTPUT_DIR must be a finished run (it holds run_summary.json, which the trainer writes last);
--allow-unfinished publishes a stopped run's folder anyway, with a warning. A checkpoint folder
(checkpoints/step-N) or a report folder of scripts/evaluate_model.py is never published. The branch
published to then holds exactly the published files: files an earlier publish left there and this one
does not include are deleted in the same commit (.gitattributes stays; other branches are not touched).

The card (README.md) of a run is rendered again for where it goes, so that its how-to snippet loads
REPO_ID (or the git clone) rather than the local folder; the folder itself is never written to.
A failed upload leaves the remote as it was. The token comes from HF_TOKEN or `hf auth login`; it is
never printed or written.
"""

import argparse
import logging
import sys

# pipelines and recipes come from this checkout's editable install (scripts/setup.sh), as in scripts/run.py.
import recipes  # noqa: F401  (registers the recipes: a run's card is rendered again for its target)
from pipelines.cli import run_entry_point


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output_dir", help="the training output folder")
    parser.add_argument("repo_id", nargs="?", help="namespace/name on the Hub")
    parser.add_argument("--push-to-git", metavar="URL", help="publish to this git remote instead of the Hub")
    parser.add_argument("--hub-endpoint", metavar="URL", help="Hub-compatible server (default: HF_ENDPOINT or huggingface.co)")
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    parser.add_argument("--revision", help="branch to publish to (default: main)")
    parser.add_argument("--commit-message", help="commit message")
    parser.add_argument("--include-checkpoints", action="store_true",
                        help="also publish checkpoints, optimizer/scheduler/RNG states and tensorboard events")
    parser.add_argument("--allow-unfinished", action="store_true",
                        help="publish a folder without run_summary.json (a run that was stopped before its end), "
                             "with a warning; checkpoint and evaluation report folders are refused even so")
    args = parser.parse_args(argv)
    if bool(args.repo_id) == bool(args.push_to_git):
        parser.error("give either REPO_ID or --push-to-git URL (exactly one)")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("httpx", "httpx2"):  # one INFO line per HTTP request otherwise
        logging.getLogger(noisy).setLevel(logging.WARNING)

    return run_entry_point(lambda: publish(args))


def publish(args) -> int:
    from pipelines.publish import publish_to_git, publish_to_hub

    if args.push_to_git:
        print(publish_to_git(args.output_dir, args.push_to_git, branch=args.revision or "main",
                             commit_message=args.commit_message, include_checkpoints=args.include_checkpoints,
                             allow_unfinished=args.allow_unfinished))
    else:
        print(publish_to_hub(args.output_dir, args.repo_id, endpoint=args.hub_endpoint, private=args.private,
                             revision=args.revision, commit_message=args.commit_message,
                             include_checkpoints=args.include_checkpoints, allow_unfinished=args.allow_unfinished))
    return 0


if __name__ == "__main__":
    sys.exit(main())
