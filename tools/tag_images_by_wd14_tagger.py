#!/usr/bin/env python
"""Tag images with a WD14 tagger (SmilingWolf's ONNX models) on onnxruntime, offline: sd-scripts'
finetune/tag_images_by_wd14_tagger.py, command line unchanged.

Writes `<image stem><caption extension>` (".txt") beside each image: the tags the model scores at or above the
thresholds, in sd-scripts' order and formatting. Nothing is downloaded: put the model's `model.onnx` and
`selected_tags.csv` in --model_dir (or in --model_dir/<repo_id with / replaced by _>, where sd-scripts saves
them, so a folder it downloaded works as it is).

Resumable: an image whose caption file exists is skipped unless --overwrite. With --append_tags every image is
tagged and its new tags are added to the existing file, never twice, so running it again changes nothing.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

if __package__ in (None, ""):  # run as `python tools/tag_images_by_wd14_tagger.py`: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from library.data import wd14  # noqa: E402
from library.data.prep import PrepRun, batched, frequency_lines, list_images, sidecar, write_text  # noqa: E402
from library.errors import UserError, exit_on_user_error  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("train_data_dir", help="folder of images to tag")
    add("--repo_id", default=wd14.DEFAULT_REPO_ID,
        help="the tagger's Hugging Face repo: names the subfolder of --model_dir sd-scripts downloads it to "
             "(nothing is downloaded here)")
    add("--model_dir", default="wd14_tagger_model",
        help=f"folder holding {wd14.MODEL_FILE} and {wd14.TAGS_FILE} (directly or in <repo_id with _ for />)")
    add("--force_download", action="store_true", help="sd-scripts' re-download: refused, this tool never downloads")
    add("--batch_size", type=int, default=1, help="images per model call")
    add("--max_data_loader_n_workers", type=int, default=None, help="threads decoding images (default: none)")
    add("--pin_memory", action="store_true", help="sd-scripts' DataLoader option: accepted, no effect here")
    add("--caption_extention", default=None, help="sd-scripts' misspelled legacy name of --caption_extension")
    add("--caption_extension", default=".txt", help="extension of the tag files written beside the images")
    add("--thresh", type=float, default=0.35, help="score at or above which a tag is written")
    add("--general_threshold", type=float, default=None, help="threshold for general tags (default: --thresh)")
    add("--character_threshold", type=float, default=None, help="threshold for character tags (default: --thresh)")
    add("--recursive", action="store_true", help="tag images in subfolders too")
    add("--remove_underscore", action="store_true", help="write tags with spaces for underscores (kaomoji kept)")
    add("--debug", action="store_true", help="print each image's rating, character and general tags")
    add("--undesired_tags", default="", help="comma-separated tags never written")
    add("--frequency_tags", action="store_true", help="print every tag's frequency at the end")
    add("--onnx", action="store_true", help="sd-scripts' switch to onnx: accepted, onnx is always used")
    add("--append_tags", action="store_true", help="add new tags to existing tag files instead of replacing them")
    add("--use_rating_tags", action="store_true", help="write the rating tag first")
    add("--use_rating_tags_as_last_tag", action="store_true", help="write the rating tag last")
    add("--character_tags_first", action="store_true", help="write character tags before general tags")
    add("--always_first_tags", default=None, help="comma-separated tags moved to the front when present")
    add("--caption_separator", default=", ", help="text between tags (include the space if wanted)")
    add("--tag_replacement", default=None,
        help="`source,target;source2,target2`, tags as written (\\, and \\; for a literal comma or semicolon)")
    add("--character_tag_expand", action="store_true",
        help="write character tags `name_(series)` as `name, series`")
    add("--overwrite", action="store_true",
        help="tag images whose tag file exists too (default: skip them; --append_tags tags every image anyway)")
    add("--device", choices=("auto", "cpu", "cuda"), default="auto",
        help="onnxruntime provider: auto (CUDA, else ROCm, else CPU, as sd-scripts), cpu or cuda")
    add("--providers", default=None,
        help="comma-separated onnxruntime execution providers, in order (overrides --device)")
    return parser


@exit_on_user_error
def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    if args.caption_extention is not None:
        args.caption_extension = args.caption_extention
    if args.force_download:
        raise UserError(f"--force_download: this tool never downloads; put {wd14.MODEL_FILE} and {wd14.TAGS_FILE} "
                        f"from https://huggingface.co/{args.repo_id} in {args.model_dir} and drop the flag")
    model_folder = find_model(Path(args.model_dir), args.repo_id)
    table = tag_table(model_folder / wd14.TAGS_FILE, args)
    options = tag_options(args)
    images = list_images(args.train_data_dir, recursive=args.recursive)
    # With --append_tags an existing file is the one appended to, so nothing counts as done.
    outputs = None if args.append_tags else (lambda image: [sidecar(image, args.caption_extension)])
    run = PrepRun("wd14 tagging", images, overwrite=args.overwrite, outputs=outputs)
    counts: Counter = Counter()
    if run.todo:
        tagger = OnnxTagger(model_folder / wd14.MODEL_FILE, len(table.names), args.device, args.providers)
        tag_all(run, tagger, table, options, args, counts)
    if args.frequency_tags:
        print("Tag frequencies:")
        for tag, count in counts.most_common():
            print(f"{tag}: {count}")
    print(run.summary(frequency_lines(counts)))


def find_model(model_dir: Path, repo_id: str) -> Path:
    """The folder with the model files: sd-scripts' <model_dir>/<repo_id, / as _> first, then model_dir itself."""
    folders = [model_dir / repo_id.replace("/", "_"), model_dir]
    for folder in folders:
        if (folder / wd14.MODEL_FILE).is_file() and (folder / wd14.TAGS_FILE).is_file():
            return folder
    missing = [name for name in (wd14.MODEL_FILE, wd14.TAGS_FILE) if not (model_dir / name).is_file()]
    raise UserError(f"--model_dir {model_dir}: no {' and no '.join(missing)} (nor in {folders[0]}); nothing is "
                    f"downloaded here: put {wd14.MODEL_FILE} and {wd14.TAGS_FILE} from "
                    f"https://huggingface.co/{repo_id} in {model_dir}")


def tag_table(path: Path, args) -> wd14.TagTable:
    replacements = wd14.parse_tag_replacement(args.tag_replacement) if args.tag_replacement is not None else ()
    return wd14.rename_tags(wd14.read_tag_table(path), separator=args.caption_separator,
                            character_tag_expand=args.character_tag_expand,
                            remove_underscore=args.remove_underscore, replacements=replacements)


def tag_options(args) -> wd14.TagOptions:
    separator = args.caption_separator
    return wd14.TagOptions(
        general_threshold=args.thresh if args.general_threshold is None else args.general_threshold,
        character_threshold=args.thresh if args.character_threshold is None else args.character_threshold,
        use_rating_tags=args.use_rating_tags, use_rating_tags_as_last_tag=args.use_rating_tags_as_last_tag,
        character_tags_first=args.character_tags_first,
        always_first_tags=wd14.split_tags(args.always_first_tags or "", separator),
        undesired_tags=frozenset(wd14.split_tags(args.undesired_tags, separator)))


class OnnxTagger:
    """model.onnx in an onnxruntime session: the input size and any fixed batch size read from the model."""

    def __init__(self, path: Path, n_tags: int, device: str, providers: str | None):
        ort = _onnxruntime()
        chosen = wd14.choose_providers(device, providers, ort.get_available_providers())
        try:
            self.session = ort.InferenceSession(str(path), providers=chosen)
        except Exception as err:  # onnxruntime raises its own exception types for a damaged or foreign file
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise UserError(f"{path}: onnxruntime cannot load it ({reason}); use a WD14 tagger's model.onnx") from None
        used = self.session.get_providers()
        if chosen[0] not in used:
            if device == "cuda" or providers:
                raise UserError(f"{chosen[0]} is installed but failed to start (onnxruntime's message above); "
                                f"fix the CUDA/cuDNN install, or use --device cpu")
            tqdm.write(f"{chosen[0]} failed to start; tagging on {used[0]}", file=sys.stderr)
        inputs = self.session.get_inputs()[0]
        self.input_name = inputs.name
        self.size = wd14.input_size(inputs.shape)
        self.fixed_batch = wd14.fixed_batch_size(inputs.shape)
        width = self.session.get_outputs()[0].shape[-1]
        self.n_tags = n_tags
        if isinstance(width, int) and width != n_tags:
            raise UserError(f"{path} scores {width} tags but its {wd14.TAGS_FILE} lists {n_tags}: the two files "
                            f"come from different taggers; put the pair from one repo in the folder")

    def scores(self, arrays: list[np.ndarray]) -> np.ndarray:
        """One row of scores per image."""
        batch = np.stack(arrays)
        if self.fixed_batch and len(arrays) < self.fixed_batch:  # a model with a fixed batch takes no less
            filler = np.zeros((self.fixed_batch - len(arrays),) + batch.shape[1:], np.float32)
            batch = np.concatenate([batch, filler])
        scores = self.session.run(None, {self.input_name: batch})[0][:len(arrays)]
        return scores.reshape(len(arrays), -1)


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise UserError("onnxruntime is not installed: pip install onnxruntime (or onnxruntime-gpu for CUDA)") from None
    return onnxruntime


def tag_all(run: PrepRun, tagger: OnnxTagger, table: wd14.TagTable, options: wd14.TagOptions, args,
            counts: Counter) -> None:
    batch_size = args.batch_size
    if tagger.fixed_batch and tagger.fixed_batch != batch_size:
        tqdm.write(f"--batch_size {batch_size}: the model takes batches of {tagger.fixed_batch}; using that",
                   file=sys.stderr)
        batch_size = tagger.fixed_batch
    workers = args.max_data_loader_n_workers or 0
    pool = ThreadPoolExecutor(workers) if workers > 0 else None

    def prepared(image: Path):
        loaded = run.load(image, mode="RGBA")  # RGBA so transparency can be laid on white
        return None if loaded is None else wd14.preprocess(loaded, tagger.size)

    try:
        for batch in run.progress(list(batched(run.todo, batch_size))):
            arrays = list(pool.map(prepared, batch)) if pool else [prepared(image) for image in batch]
            ready = [(image, array) for image, array in zip(batch, arrays) if array is not None]
            if not ready:
                continue
            scores = tagger.scores([array for _, array in ready])
            for (image, _), row in zip(ready, scores):
                if len(row) != tagger.n_tags:
                    raise UserError(f"the model scored {len(row)} tags but {wd14.TAGS_FILE} lists {tagger.n_tags}; "
                                    f"use the pair of files from one tagger")
                tags = wd14.choose_tags(row, table, options)
                write_tags(image, tags, args)
                counts.update(tags.tags)
                run.written += 1
    finally:
        if pool:
            pool.shutdown()


def write_tags(image: Path, tags: wd14.ImageTags, args) -> None:
    path = sidecar(image, args.caption_extension)
    text = args.caption_separator.join(tags.tags)
    if args.append_tags and path.exists():
        try:
            existing = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise UserError(f"{path}: cannot be read as UTF-8 text to append to ({err}); fix or remove it") from None
        text = wd14.merge_tags(existing, tags.tags, args.caption_separator)
    write_text(path, text + "\n")  # sd-scripts ends its tag files with a newline
    if args.debug:
        tqdm.write(f"{image}:\n\tRating tags: {tags.rating or ''}\n\tCharacter tags: "
                   f"{args.caption_separator.join(tags.characters)}\n\tGeneral tags: "
                   f"{args.caption_separator.join(tags.general)}")


if __name__ == "__main__":
    main()
