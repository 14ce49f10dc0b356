"""`python -m lib_lora tag` (step 3) and `python -m lib_lora tags` (step 4)."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from lib_lora.config import TagConfig, add_arguments, from_args
from lib_lora.errors import UserError
from lib_lora.progress import TqdmProgress

TAG_FIELDS = {"tagger", "model", "tags_file", "general_threshold", "character_threshold", "score_floor", "sort",
              "trigger", "keep_underscores", "max_tags", "existing", "match_background", "batch_size", "device",
              "allow_download"}
RULE_FIELDS = {"preset", "trigger", "blacklist", "whitelist", "implications_file", "aliases_file"}


def _skip(keep: set[str]) -> list[str]:
    return [f.name for f in dataclasses.fields(TagConfig) if f.name not in keep]


def register(subparsers: argparse._SubParsersAction) -> None:
    tag = subparsers.add_parser("tag", help="step 3: tag images with DeepDanbooru or WD14, write <image>.txt captions")
    tag.add_argument("dataset", help="image folder, or a training folder with <repeats>_<name> subfolders")
    add_arguments(tag, TagConfig, skip=_skip(TAG_FIELDS))
    # The short flags: --threshold is the general threshold, --tags the tag list file.
    tag.add_argument("--threshold", dest="general_threshold", type=float, help="same as --general-threshold")
    tag.add_argument("--tags", dest="tags_file", help="same as --tags-file")
    tag.add_argument("--from-scores", action="store_true",
                     help="re-write captions from the saved scores (new threshold/sort/trigger) without running the tagger")
    tag.set_defaults(func=run_tag)

    tags = subparsers.add_parser("tags", help="step 4: apply the tag rules of a preset; --undo / --redo step through edits")
    tags.add_argument("dataset", help="image folder, or a training folder with <repeats>_<name> subfolders")
    add_arguments(tags, TagConfig, skip=_skip(RULE_FIELDS))
    tags.add_argument("--dry-run", action="store_true", help="print the per-image diff and totals; change nothing")
    tags.add_argument("--show", type=int, default=50, help="images listed in the diff (default: 50)")
    group = tags.add_mutually_exclusive_group()
    group.add_argument("--undo", action="store_true", help="undo the last edit of the captions")
    group.add_argument("--redo", action="store_true", help="redo the last undone edit")
    group.add_argument("--history", action="store_true", help="list the journaled edits")
    group.add_argument("--accept", action="store_true", help="keep the captions as they are; forget undo history and originals")
    group.add_argument("--revert", action="store_true", help="restore the original captions (undoable)")
    group.add_argument("--frequencies", action="store_true", help="print the tag frequency table (with Chinese names)")
    tags.add_argument("--force", action="store_true", help="undo/redo even over files changed outside the editor")
    edit = tags.add_argument_group("bulk edits (instead of a preset; each is one undoable step)")
    edit.add_argument("--add", metavar="TAGS", help="add these comma-separated tags")
    edit.add_argument("--remove", metavar="TAGS", help="remove these comma-separated tags")
    edit.add_argument("--replace", nargs=2, metavar=("OLD", "NEW"), help="replace a tag ('' as NEW removes it)")
    edit.add_argument("--regex", action="store_true", help="--replace OLD is a regular expression, NEW may use \\1")
    edit.add_argument("--front", metavar="TAG", help="move this tag to the front of the captions that have it")
    edit.add_argument("--where", metavar="TAGS", help="only images having all these tags (English or Chinese)")
    edit.add_argument("--where-any", metavar="TAGS", help="only images having at least one of these tags")
    edit.add_argument("--where-not", metavar="TAGS", help="only images having none of these tags")
    tags.set_defaults(func=run_tags)


def run_tag(args: argparse.Namespace) -> int:
    from lib_lora.tagging.captions import image_dirs, recaption, tag_dataset
    from lib_lora.tagging.taggers import tagger_for

    cfg = from_args(TagConfig, args)
    dirs = image_dirs(args.dataset)
    if args.from_scores:
        for d in dirs:
            print(recaption(d, cfg).summary())
        return 0
    if cfg.tagger == "webui":
        raise UserError("The webui tagger only exists inside the WebUI; from the command line use deepdanbooru or wd14.")
    tagger = tagger_for(cfg)
    for d in dirs:
        progress = TqdmProgress(f"tag {d.name}", "img")
        try:
            report = tag_dataset(d, tagger, cfg, progress)
        finally:
            progress.close()
        print(report.summary())
    return 0


def run_tags(args: argparse.Namespace) -> int:
    from lib_lora.tagging.captions import image_dirs
    from lib_lora.tagging.rules import apply_preset, preview_preset
    from lib_lora.tagging.session import EditSession

    cfg = from_args(TagConfig, args)
    for d in image_dirs(args.dataset):
        if len(image_dirs(args.dataset)) > 1:
            print(f"== {Path(d).name}")
        if args.undo or args.redo or args.history or args.accept or args.revert or args.frequencies:
            session = EditSession(d)
            for note in session.notes:
                print(note)
            for p in session.problems:
                print(f"skipped: {p}")
            if args.undo:
                label = session.undo(force=args.force)
                print(f"undone: {label}" if label else "nothing to undo.")
            elif args.redo:
                label = session.redo(force=args.force)
                print(f"redone: {label}" if label else "nothing to redo.")
            elif args.history:
                hist = session.history()
                for n, label, applied in hist:
                    print(f"{n:4d} {'applied' if applied else 'undone '} {label}")
                if not hist:
                    print("no edits journaled.")
            elif args.accept:
                session.accept()
                print("accepted: captions kept, undo history and original captions forgotten.")
            elif args.revert:
                print(f"reverted {session.revert_to_original()} captions to their originals (undo with --undo).")
            else:
                for tag, n in session.frequencies():
                    print(f"{n:6d}  {session.display(tag)}")
            continue
        if args.add or args.remove or args.replace or args.front:
            _bulk_edit(EditSession(d), args)
            continue
        trigger = cfg.trigger or None
        if trigger is None:
            from lib_lora.tagging.captions import default_trigger, read_manifest

            trigger = default_trigger(Path(d), read_manifest(Path(d)))
        kw = {"blacklist": cfg.blacklist, "whitelist": cfg.whitelist,
              "implications_file": cfg.implications_file or None, "aliases_file": cfg.aliases_file or None}
        if args.dry_run:
            diff = preview_preset(d, cfg.preset, trigger, **kw)
            print(diff.format(max_images=args.show))
            print("dry run: nothing was written.")
        else:
            diff = apply_preset(d, cfg.preset, trigger, **kw)
            print(diff.format(max_images=args.show))
            print(f"captions rewritten; undo with: python -m lib_lora tags {args.dataset} --undo")
    return 0


def _bulk_edit(session, args: argparse.Namespace) -> None:  # noqa: ANN001 - EditSession, imported lazily
    def terms(text: str | None) -> list[str]:
        return [t.strip() for t in (text or "").split(",") if t.strip()]

    for note in session.notes:
        print(note)
    for p in session.problems:
        print(f"skipped: {p}")
    names = None
    if args.where or args.where_any or args.where_not:
        names = session.filter(all_of=terms(args.where), any_of=terms(args.where_any), none_of=terms(args.where_not))
        print(f"{len(names)} of {len(session.captions)} images match the filter.")
    if args.add:
        print(f"add: {session.add(args.add, names)} captions changed")
    if args.remove:
        print(f"remove: {session.remove(args.remove, names)} captions changed")
    if args.replace:
        print(f"replace: {session.replace(args.replace[0], args.replace[1], names, regex=args.regex)} captions changed")
    if args.front:
        print(f"front: {session.move_to_front(args.front, names)} captions changed")
    print(f"undo with: python -m lib_lora tags {args.dataset} --undo")
