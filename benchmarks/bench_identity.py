"""Identity filter throughput: engines.identity vs calling insightface's FaceAnalysis.get in a plain loop.

    python benchmarks/bench_identity.py [--batch 16] [--repeats 5] [--providers cpu|auto] [--backend insightface|dlib]

Writes the tiny face pack (flen-tiny) into a temporary folder, then times, on the same batch of synthetic
256x256 faces (one face each, a few identities and positions):

* reference building: ``build_bank`` (detect + choose + embed + pose per photo) vs ``FaceAnalysis.get`` per photo;
* filtering: ``score_images`` (detect + embed + pose + cosine + routing per image) vs ``FaceAnalysis.get`` per image
  plus a cosine to the first reference.

``--backend dlib`` times the dlib back-end (engines.identity_dlib, weights from face_recognition_models) on
real photos instead: the batch cycles scikit-image's astronaut and single-face crops of insightface's group
photo t1.jpg; the direct side is dlib called in a plain loop (HOG detector, 5-point predictor,
``compute_face_descriptor`` of the first face, plus the cosine for filtering).

Images/second is the median over ``--repeats`` runs after one warm-up; ratio = pack / direct (> 1: the pack is
faster). Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engines import face_backends as fb  # noqa: E402
from engines import identity as idn  # noqa: E402
from tools import tiny_models as tm  # noqa: E402


def _images(n: int) -> list[np.ndarray]:
    out = []
    for k in range(n):
        off = ((k % 5) * 8 - 16, (k % 3) * 8 - 8)
        out.append(np.asarray(tm.draw_test_face(1 + k % 4, 256, offset=off, scale=0.8 + 0.05 * (k % 4))))
    return out


def _rate(fn, n: int, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return n / statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--providers", choices=["cpu", "auto"], default="cpu")
    ap.add_argument("--backend", choices=["insightface", "dlib"], default="insightface")
    args = ap.parse_args(argv)
    if args.backend == "dlib":
        return bench_dlib(args.batch, args.repeats)
    providers = ["CPUExecutionProvider"] if args.providers == "cpu" else idn.available_providers()

    from insightface.app import FaceAnalysis

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "insightface"
        pack = tm.write_insightface_pack(root / "models" / tm.INSIGHTFACE_PACK)
        model = fb.load_face_model(root, tm.INSIGHTFACE_PACK, 640, providers)
        app = FaceAnalysis(name=str(pack), root=str(root), allowed_modules=["detection", "recognition"],
                           providers=providers)
        app.prepare(ctx_id=0 if "CUDAExecutionProvider" in providers else -1, det_size=(640, 640))

        rgb = _images(args.batch)
        bgr = [np.ascontiguousarray(im[:, :, ::-1]) for im in rgb]
        bank = idn.build_bank(model, rgb[:4], root)
        ref = bank.references[0].embedding

        def direct_reference():
            return [app.get(im)[0].normed_embedding for im in bgr]

        def direct_filter():
            return [float(app.get(im)[0].normed_embedding @ ref) for im in bgr]

        results = {
            "reference": (_rate(lambda: idn.build_bank(model, rgb, root), args.batch, args.repeats),
                          _rate(direct_reference, args.batch, args.repeats)),
            "filter": (_rate(lambda: idn.score_images(bank, model, rgb, threshold=0.9), args.batch, args.repeats),
                       _rate(direct_filter, args.batch, args.repeats)),
        }
    print(f"providers: {', '.join(providers)}; batch {args.batch}; median of {args.repeats} runs; "
          f"tiny pack {tm.INSIGHTFACE_PACK}, 256x256 images, det_size 640")
    print("| step | FLENwheel (img/s) | FaceAnalysis.get loop (img/s) | ratio |")
    print("|---|---|---|---|")
    for step, (ours, direct) in results.items():
        print(f"| {step} | {ours:.1f} | {direct:.1f} | {ours / direct:.2f} |")
    return 0


def _real_photos(n: int) -> tuple[list[np.ndarray], str]:
    import importlib.util

    from PIL import Image
    from skimage import data

    folder = Path(next(iter(importlib.util.find_spec("insightface").submodule_search_locations))) / "data" / "images"
    group = np.asarray(Image.open(folder / "t1.jpg").convert("RGB"))
    boxes = [(65, 284, 170, 389), (734, 365, 838, 470), (1114, 284, 1218, 389), (452, 300, 578, 425)]
    crops = [np.ascontiguousarray(group[y1 - (y2 - y1) // 2:y2 + (y2 - y1) // 2,
                                        x1 - (x2 - x1) // 2:x2 + (x2 - x1) // 2]) for x1, y1, x2, y2 in boxes]
    pool = [data.astronaut()] + crops
    shapes = ", ".join(f"{im.shape[1]}x{im.shape[0]}" for im in pool)
    return [pool[k % len(pool)] for k in range(n)], f"astronaut + 4 face crops of t1.jpg ({shapes}), cycled"


def bench_dlib(batch: int, repeats: int) -> int:
    import dlib

    from engines import identity_dlib as idd

    model = fb.load_face_model("", idd.DLIB_MODEL, 640)
    folder = idd.models_folder()
    detector = dlib.get_frontal_face_detector()
    predictor = dlib.shape_predictor(str(folder / idd.PREDICTOR_FILE))
    recogniser = dlib.face_recognition_model_v1(str(folder / idd.RECOGNISER_FILE))
    rgb, what = _real_photos(batch)
    bank = idn.build_bank(model, rgb[:1])
    ref = bank.references[0].embedding

    def embed(im):
        rect = detector(im, 0)[0]
        d = np.asarray(recogniser.compute_face_descriptor(im, predictor(im, rect)), np.float32)
        return d / np.linalg.norm(d)

    results = {
        "reference": (_rate(lambda: idn.build_bank(model, rgb), batch, repeats),
                      _rate(lambda: [embed(im) for im in rgb], batch, repeats)),
        "filter": (_rate(lambda: idn.score_images(bank, model, rgb, threshold=0.92), batch, repeats),
                   _rate(lambda: [float(embed(im) @ ref) for im in rgb], batch, repeats)),
    }
    print(f"dlib {dlib.__version__} on CPU; batch {batch}; median of {repeats} runs; {what}")
    print("| step | FLENwheel dlib back-end (img/s) | dlib plain loop (img/s) | ratio |")
    print("|---|---|---|---|")
    for step, (ours, direct) in results.items():
        print(f"| {step} | {ours:.1f} | {direct:.1f} | {ours / direct:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
