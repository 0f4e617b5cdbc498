"""Salience DETR demo: detections on images, folders, a video file or a webcam, Detectron2 style.

    python demo/demo.py --config-file configs/salience_detr/salience_detr_r50_4scale_12ep.py \
        --input "photos/*.jpg" --output out/ --show-salience --opts train.init_checkpoint=model.pth

Without --output the pictures are shown in a window (needs an OpenCV build with a GUI). The confidence
threshold applies in every mode. Videos are never overwritten unless --overwrite is given.
--output-json FILE writes the detections as COCO results (image ids of the config's test dataset where an
input is one of its images; frame numbers for videos); with --confidence-threshold 0 a dataset's images
give a file that ``python -m salience_detr.tools.evaluate_json`` scores.
"""

from __future__ import annotations

import argparse
import glob
import logging
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import cv2
import numpy as np
import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from detectron2.utils.logger import setup_logger  # noqa: E402
from predictor import VisualizationDemo  # noqa: E402  (after the sys.path line, as in detectron2's demo)

from salience_detr.config import load_config  # noqa: E402  (predictor imported salience_detr first)
from salience_detr.data.image_io import read_image as decode_image  # noqa: E402
from salience_detr.tools.user_errors import USER_ERROR_STATUS, USER_ERRORS, describe  # noqa: E402
from salience_detr.utils.coco_results import ResultsFile  # noqa: E402

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
WINDOW_NAME = "Salience DETR"
ESCAPE_KEY = 27
# Preferred codecs per container, best first; the first one this OpenCV build can open is used.
CODECS = {".mp4": ("avc1", "mp4v"), ".avi": ("MJPG", "XVID", "mp4v"), ".mkv": ("X264", "avc1", "mp4v")}
DEFAULT_VIDEO_FPS = 30.0
BATCHES_PER_WINDOW = 8  # images read ahead for grouping by input size: this many batches (run_images)

logger = logging.getLogger("salience_detr.demo")


class DemoError(RuntimeError):
    """A problem with the demo's inputs or outputs that the user can fix (the message says how)."""


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Salience DETR demo on images, videos and webcams")
    parser.add_argument("--config-file", required=True, metavar="FILE", help="path to a LazyConfig .py file")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", nargs="+", help="image paths, globs ('dir/*.jpg') or folders")
    source.add_argument("--webcam", action="store_true", help="read frames from a camera")
    source.add_argument("--video-input", help="path to a video file")
    parser.add_argument("--camera", type=int, default=0, help="camera index for --webcam")
    parser.add_argument(
        "--output",
        help="file or folder to write to; a folder for several images; a video file for --video-input/--webcam. "
        "Without it, results are shown in a window.",
    )
    parser.add_argument("--overwrite", action="store_true", help="allow replacing an existing output video")
    parser.add_argument("--codec", help="preferred FourCC for output videos (e.g. mp4v); falls back if missing")
    parser.add_argument("--max-frames", type=int, help="stop a video or webcam after this many frames")
    parser.add_argument("--confidence-threshold", type=float, default=0.5, help="minimum score of drawn boxes")
    parser.add_argument("--show-salience", action="store_true", help="draw each level's salience heat-map")
    parser.add_argument(
        "--salience-layout", choices=("beside", "over"), default="beside", help="heat-maps beside or over detections"
    )
    parser.add_argument(
        "--show-queries", action="store_true", help="draw the tokens each encoder layer kept and the selected queries"
    )
    parser.add_argument("--device", help="cpu or cuda (default: the config's train.device)")
    parser.add_argument(
        "--output-json",
        metavar="FILE",
        help="also write the detections (score >= --confidence-threshold; 0 keeps all) as COCO results JSON; "
        "without --output nothing is drawn or shown",
    )
    parser.add_argument(
        "--batch-size", type=int, default=1, help="images per forward for --input (images of one size batch together)"
    )
    parser.add_argument(
        "--opts", default=[], nargs=argparse.REMAINDER, help="config overrides, e.g. train.init_checkpoint=model.pth"
    )
    return parser


def setup_cfg(args: argparse.Namespace):
    if not os.path.isfile(args.config_file):
        raise DemoError(f"config file {args.config_file!r} does not exist; pass a path to a LazyConfig .py file")
    return load_config(args.config_file, args.opts, inference=True)


def expand_inputs(patterns: Sequence[str]) -> list[str]:
    """Paths, globs and folders (their images, sorted) -> image files, in the order given."""
    files: list[str] = []
    for pattern in patterns:
        if os.path.isdir(pattern):
            found = sorted(str(p) for p in Path(pattern).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        elif glob.has_magic(pattern):
            found = sorted(path for path in glob.glob(os.path.expanduser(pattern)) if os.path.isfile(path))
        else:
            found = [pattern] if os.path.isfile(pattern) else []
        if not found:
            raise DemoError(f"--input {pattern!r} matches no image file (check the path, glob or folder)")
        files.extend(found)
    return files


def image_output_paths(files: Sequence[str], output: str) -> list[str]:
    """One output file per input: ``output`` itself for a single image when it names an image file, else a folder
    (an existing one, one ending in a separator, or a name without extension)."""
    is_folder = os.path.isdir(output) or output.endswith(os.sep) or not Path(output).suffix
    if len(files) == 1 and not is_folder:
        if Path(output).suffix.lower() not in IMAGE_EXTENSIONS:
            raise DemoError(f"--output {output!r}: use an image extension ({', '.join(IMAGE_EXTENSIONS)}) or a folder")
        return [output]
    if os.path.isfile(output):
        raise DemoError(f"--output {output!r} is a file, but {len(files)} images need a folder")
    names = [os.path.basename(path) for path in files]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise DemoError(f"several inputs share the file name(s) {duplicates}; run them into separate --output folders")
    return [os.path.join(output, name) for name in names]


def read_image(path: str) -> np.ndarray:
    """BGR ``uint8``, decoded exactly as training and evaluation decode (16-bit, grayscale, alpha, EXIF)."""
    try:
        return decode_image(path, format="BGR")
    except (OSError, ValueError) as error:
        raise DemoError(f"cannot read image {path!r} ({error}); pass an image file in a common format") from error


def show(picture_bgr: np.ndarray) -> bool:
    """Show a picture in a window; False when the user pressed Escape."""
    try:
        cv2.namedWindow(WINDOW_NAME, cv2.WINDOW_NORMAL)
        cv2.imshow(WINDOW_NAME, picture_bgr)
        return cv2.waitKey(1) != ESCAPE_KEY
    except cv2.error as error:
        message = f"this OpenCV build cannot open a window ({error.err}); pass --output to write files"
        raise DemoError(message) from error


def open_video_writer(path: str, fps: float, frame_size: tuple[int, int], preferred: str | None) -> cv2.VideoWriter:
    """A writer for ``path`` with the first codec that works (``preferred`` first), ``frame_size`` as (w, h)."""
    extension = os.path.splitext(path)[1].lower()
    if extension not in CODECS:
        raise DemoError(f"output video {path!r} must end in one of {sorted(CODECS)}")
    candidates = ([preferred] if preferred else []) + [c for c in CODECS[extension] if c != preferred]
    for codec in candidates:
        if len(codec) != 4:
            raise DemoError(f"--codec must be a four-character FourCC such as mp4v, got {codec!r}")
        writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*codec), fps, frame_size, True)
        if writer.isOpened():
            if codec != candidates[0]:
                logger.warning("Codec %s is not available here; wrote %s with %s instead.", candidates[0], path, codec)
            return writer
        writer.release()
    raise DemoError(f"no video codec among {candidates} can write {path!r}; try another extension (.avi) or --codec")


def video_output_path(args: argparse.Namespace, source_name: str) -> str | None:
    """Where the video goes (None: show it); refuses to replace an existing file without --overwrite."""
    if not args.output:
        return None
    output = args.output
    if os.path.isdir(output) or output.endswith(os.sep):
        output = os.path.join(output, Path(source_name).stem + ".mp4")
    if os.path.exists(output) and not args.overwrite:
        raise DemoError(f"{output!r} already exists; choose another --output or pass --overwrite")
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    return output


def read_frames(capture: cv2.VideoCapture, max_frames: int | None) -> Iterator[np.ndarray]:
    count = 0
    while max_frames is None or count < max_frames:
        ok, frame = capture.read()
        if not ok:
            return
        count += 1
        yield frame


def open_capture(source: int | str) -> cv2.VideoCapture:
    capture = cv2.VideoCapture(source)
    if not capture.isOpened():
        what = f"camera {source}" if isinstance(source, int) else f"video file {source!r}"
        hint = "check that it is connected and not in use" if isinstance(source, int) else "check the path and format"
        raise DemoError(f"cannot open {what}: {hint}")
    return capture


def deliver_picture(picture: np.ndarray, output: str | None) -> bool:
    """Write the picture to ``output``, or show it when there is none; False when the user pressed Escape."""
    if output is None:
        if not show(picture):
            return False
        cv2.waitKey(0)
        return True
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    if not cv2.imwrite(output, picture):
        raise DemoError(f"could not write {output!r} (check the folder's permissions and free space)")
    return True


def run_images(
    demo: VisualizationDemo, args: argparse.Namespace, files: list[str], outputs: list, results: ResultsFile | None
) -> None:
    """Batches of ``--batch-size`` images through the model; pictures unless only --output-json was asked for.

    The predictor batches only images of one input size, so it is handed a window of several batches at a time to
    group: with mixed sizes, chunks of exactly ``--batch-size`` files would mostly run as smaller batches."""
    draw = results is None or args.output is not None
    window = args.batch_size * BATCHES_PER_WINDOW
    with tqdm.tqdm(total=len(files), disable=len(files) == 1, desc="images") as progress:
        for first in range(0, len(files), window):
            paths = files[first : first + window]
            start = time.perf_counter()
            images = [read_image(path) for path in paths]
            predicted = demo.run_on_images(images, draw=draw, batch_size=args.batch_size)
            seconds = (time.perf_counter() - start) / len(paths)
            for path, output, (_, kept, picture) in zip(paths, outputs[first:], predicted):
                logger.info("%s: %d detections >= %g in %.2fs", path, len(kept), args.confidence_threshold, seconds)
                if results is not None:
                    results.add_image(path, kept)
                if draw and not deliver_picture(picture, output):
                    return
            progress.update(len(paths))


def run_stream(
    demo: VisualizationDemo,
    args: argparse.Namespace,
    capture: cv2.VideoCapture,
    source: int | str,
    output: str | None,
    results: ResultsFile | None = None,
) -> int:
    """Video file or camera: every frame through the model; returns the number of frames read. Frames are
    counted from 0 in ``results``; only --output-json (no --output) draws and shows nothing."""
    total = int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) if isinstance(source, str) else 0
    if args.max_frames is not None:
        total = min(total, args.max_frames) if total > 0 else args.max_frames
    fps = capture.get(cv2.CAP_PROP_FPS) or DEFAULT_VIDEO_FPS
    writer = None
    count = 0
    draw = results is None or output is not None
    source_name = f"camera {source}" if isinstance(source, int) else source
    try:
        frames = read_frames(capture, args.max_frames)
        for kept, picture in tqdm.tqdm(demo.run_on_frames(frames, draw=draw), total=total or None, desc="frames"):
            if results is not None:
                results.add_frame(source_name, count, kept)
            count += 1
            if not draw:
                continue
            if output is None:
                if not show(picture):
                    break
                continue
            if writer is None:
                writer = open_video_writer(output, fps, (picture.shape[1], picture.shape[0]), args.codec)
            writer.write(picture)
    finally:
        if writer is not None:
            writer.release()
    if count == 0:
        raise DemoError(f"no frame could be read from {source_name}")
    if output is not None:
        logger.info("Wrote %d frames to %s", count, output)
    return count


def check_results_path(path: str) -> None:
    try:
        ResultsFile.check_path(path)
    except ValueError as error:
        raise DemoError(f"--output-json: {error}") from error


def build_demo(cfg, args: argparse.Namespace) -> VisualizationDemo:
    return VisualizationDemo(
        cfg,
        confidence_threshold=args.confidence_threshold,
        show_salience=args.show_salience,
        show_queries=args.show_queries,
        salience_layout=args.salience_layout,
        device=args.device,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = get_parser().parse_args(argv)
    setup_logger(name="salience_detr")
    logger.info("Arguments: %s", args)
    try:
        if args.max_frames is not None and args.max_frames < 1:
            raise DemoError(f"--max-frames must be a positive number of frames, got {args.max_frames}")
        if args.batch_size < 1:
            raise DemoError(f"--batch-size must be a positive number of images, got {args.batch_size}")
        if args.output_json:
            check_results_path(args.output_json)
        cfg = setup_cfg(args)
        # inputs and outputs are checked before the model is built, so mistakes are reported in a second
        if args.input:
            files = expand_inputs(args.input)
            outputs = image_output_paths(files, args.output) if args.output else [None] * len(files)
            demo = build_demo(cfg, args)
            results = ResultsFile(args.output_json, demo.metadata) if args.output_json else None
            run_images(demo, args, files, outputs, results)
        else:
            source = args.camera if args.webcam else args.video_input
            output = video_output_path(args, "webcam" if args.webcam else source)
            capture = open_capture(source)
            try:
                demo = build_demo(cfg, args)
                results = ResultsFile(args.output_json, demo.metadata) if args.output_json else None
                run_stream(demo, args, capture, source, output, results)
            finally:
                capture.release()
        if results is not None:
            results.write()
    except DemoError as error:
        logger.error("%s", error)
        return USER_ERROR_STATUS
    except USER_ERRORS as error:  # a typo in --opts, a checkpoint of another model: the message names the fix
        logger.error("%s", describe(error))
        return USER_ERROR_STATUS
    return 0


if __name__ == "__main__":
    sys.exit(main())
