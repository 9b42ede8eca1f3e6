"""Identity filter throughput: engines.identity vs calling insightface's FaceAnalysis.get in a plain loop.

    python benchmarks/bench_identity.py [--batch 16] [--repeats 5] [--providers cpu|auto]

Writes the tiny face pack (flen-tiny) into a temporary folder, then times, on the same batch of synthetic
256x256 faces (one face each, a few identities and positions):

* reference building: ``build_bank`` (detect + choose + embed + pose per photo) vs ``FaceAnalysis.get`` per photo;
* filtering: ``score_images`` (detect + embed + pose + cosine + routing per image) vs ``FaceAnalysis.get`` per image
  plus a cosine to the first reference.

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

from engines import identity as idn  # noqa: E402
from training import tiny_models as tm  # noqa: E402


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
    args = ap.parse_args(argv)
    providers = ["CPUExecutionProvider"] if args.providers == "cpu" else idn.available_providers()

    from insightface.app import FaceAnalysis

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "insightface"
        pack = tm.write_insightface_pack(root / "models" / tm.INSIGHTFACE_PACK)
        model = idn.load_face_model(root, tm.INSIGHTFACE_PACK, 640, providers)
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


if __name__ == "__main__":
    raise SystemExit(main())
