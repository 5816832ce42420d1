"""Training-sample construction at 512² (reference 224²) on real photos: our grain ``TrainSample`` vs the original's
recipe, samples/s on one worker core.

The photos are scikit-image's sample images (astronaut, chelsea, coffee, rocket, ...), saved as JPEG (q92) and
prepared by ``sketchcomp_jax.data.prepare.prepare_dataset`` (XDoG sketches, longer side ≤ 1024) in a temporary
directory. Both sides then build samples from the same stored records (encoded image + sketch PNG), decoding
included, in one process with one thread (OpenCV, BLAS and OpenMP limited to one thread):

* ours: ``sketchcomp_jax.data.pipeline.TrainSample.random_map`` (what each grain worker runs per element);
* anchor: the original's ``danbooru.py`` ``__getitem__`` recipe without torch: PIL decode + ``cv2.imdecode``
  (the original reads the image twice), the RoI padded crop, albumentations-0.4.3-style reference augmentation
  with OpenCV (``cv2.resize`` INTER_LINEAR, ``cv2.flip``, rotation by ``cv2.warpAffine`` REFLECT_101,
  ``cv2.blur``, elastic = ``cv2.warpAffine`` + two ``scipy.ndimage.gaussian_filter`` (σ 50) + ``cv2.remap``),
  CLIP ToTensor/Normalize in numpy, ToTensor/Normalize of the whole image and of the RGB sketch, the Bézier
  mask with the ``bezier`` package (``Curve.evaluate`` called as often as the original calls it) drawn with
  ``PIL.ImageDraw``, the square crop, and ``cv2.resize`` (float32, bilinear) standing in for torchvision's
  ``T.Resize`` of the three tensors, then ``image * mask``.

Random draws differ between the two sides (each uses its own generator) but follow the same distributions;
medians over repeats after a warm-up. Also printed: grain loader throughput with 0 and 2 worker processes.
Last line: {"benchmark": "data_pipeline_sample", "unit": "samples/s", "ours", "anchor", "anchor_name", "speedup"}.

    python benchmarks/data_pipeline.py [--quick] [--repeats 5] [--samples 48] [--no-loader]

Needs scikit-image, opencv-python-headless (< 5) and bezier.
"""
from __future__ import annotations

import os

# one thread per worker core, set before numpy / OpenCV / scipy load their thread pools
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import io  # noqa: E402
import pathlib  # noqa: E402
import random  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import print_result  # noqa: E402

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry",
          "stereo_motorcycle", "retina")
RESOLUTION, REFERENCE_SIZE = 512, 224


def write_photos(folder: pathlib.Path, names) -> list[tuple[str, tuple[int, ...]]]:
    import skimage.data
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    shapes = []
    for name in names:
        image = getattr(skimage.data, name)()
        if isinstance(image, tuple):  # stereo_motorcycle: (left, right, disparity)
            image = image[0]
        Image.fromarray(image).save(folder / f"{name}.jpg", quality=92)
        shapes.append((name, image.shape[:2]))
    return shapes


def load_elements(data_dir: str) -> list[dict]:
    from sketchcomp_jax.data.pipeline import RecordSource
    from sketchcomp_jax.data.records import load_builder

    elements = []
    for split in load_builder(data_dir).info.splits:
        source = RecordSource(data_dir, split)
        elements += [source[i] for i in range(len(source))]
    return elements


# --------------------------------------------------------------------------------------------------
# The original's recipe, torch-free (danbooru.py __getitem__ + albumentations 0.4.3 with OpenCV)
# --------------------------------------------------------------------------------------------------

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _to_tensor(array_hwc, mean, std):
    """torchvision ToTensor + Normalize in numpy: uint8 HWC → float32 CHW."""
    import numpy as np

    x = array_hwc.astype(np.float32).transpose(2, 0, 1) / np.float32(255.0)
    return (x - np.asarray(mean, np.float32)[:, None, None]) / np.asarray(std, np.float32)[:, None, None]


def _albumentations_reference(crop, rnd: random.Random):
    """Compose([Resize(224, 224), HorizontalFlip(), Rotate(limit=20), Blur(p=0.3), ElasticTransform(p=0.3)])."""
    import cv2
    import numpy as np
    from scipy.ndimage import gaussian_filter

    out = cv2.resize(crop, (REFERENCE_SIZE, REFERENCE_SIZE), interpolation=cv2.INTER_LINEAR)
    if rnd.random() < 0.5:
        out = cv2.flip(out, 1)
    if rnd.random() < 0.5:
        angle = rnd.uniform(-20, 20)
        h, w = out.shape[:2]
        matrix = cv2.getRotationMatrix2D((w / 2, h / 2), angle, 1.0)
        out = cv2.warpAffine(out, matrix, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
    if rnd.random() < 0.3:
        k = int(rnd.choice([3, 5, 7]))
        out = cv2.blur(out, (k, k))
    if rnd.random() < 0.3:
        rs = np.random.RandomState(rnd.randint(0, 10000))
        h, w = out.shape[:2]
        center, square = np.float32((h, w)) // 2, min((h, w)) // 3
        pts1 = np.float32([center + square, [center[0] + square, center[1] - square], center - square])
        pts2 = pts1 + rs.uniform(-50, 50, size=pts1.shape).astype(np.float32)
        out = cv2.warpAffine(out, cv2.getAffineTransform(pts1, pts2), (w, h), flags=cv2.INTER_LINEAR,
                             borderMode=cv2.BORDER_REFLECT_101)
        dx = np.float32(gaussian_filter(rs.rand(h, w) * 2 - 1, 50.0) * 1.0)
        dy = np.float32(gaussian_filter(rs.rand(h, w) * 2 - 1, 50.0) * 1.0)
        x, y = np.meshgrid(np.arange(w), np.arange(h))
        out = cv2.remap(out, np.float32(x + dx), np.float32(y + dy), cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
    return out


def original_sample(element: dict, rnd: random.Random) -> dict:
    import bezier
    import cv2
    import numpy as np
    from PIL import Image, ImageDraw

    img_p = Image.open(io.BytesIO(element["image"])).convert("RGB")
    W, H = img_p.size
    sw, sh = rnd.randint(0, W), rnd.randint(0, H)
    cx, cy = rnd.randint(sw // 2, W - sw // 2), rnd.randint(sh // 2, H - sh // 2)
    bbox = [cx - sw // 2, cy - sh // 2, cx + sw // 2, cy + sh // 2]
    pad = [bbox[0] - min(10, bbox[0]), bbox[1] - min(10, bbox[1]), bbox[2] + min(10, W - bbox[2]),
           bbox[3] + min(10, H - bbox[3])]
    img_np = cv2.cvtColor(cv2.imdecode(np.frombuffer(element["image"], np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    ref = _albumentations_reference(img_np[pad[1]:pad[3], pad[0]:pad[2], :], rnd)
    ref_tensor = _to_tensor(np.asarray(Image.fromarray(ref)), CLIP_MEAN, CLIP_STD)

    image_tensor = _to_tensor(np.asarray(img_p), (0.5,) * 3, (0.5,) * 3)
    sketch = Image.open(io.BytesIO(element["sketch"])).convert("RGB")
    sketch_tensor = _to_tensor(np.asarray(sketch), (0.5,) * 3, (0.5,) * 3)
    ext = [bbox[0] - rnd.randint(0, int(0.4 * bbox[0])), bbox[1] - rnd.randint(0, int(0.4 * bbox[1])),
           bbox[2] + rnd.randint(0, int(0.4 * (W - bbox[2]))), bbox[3] + rnd.randint(0, int(0.4 * (H - bbox[3])))]
    if rnd.uniform(0, 1) < 0.5:
        mask_img = Image.new("RGB", (W, H), (255, 255, 255))
        x0, y0, x1, y1 = bbox
        mx, my = (x0 + x1) / 2, (y0 + y1) / 2
        curves = [bezier.Curve(np.asfortranarray(nodes, dtype=np.float64), degree=2) for nodes in (
            [[x0, mx, x1], [y0, ext[1], y0]], [[x1, ext[2], x1], [y0, my, y1]],
            [[x1, mx, x0], [y1, ext[3], y1]], [[x0, ext[0], x0], [y1, my, y0]])]
        pts = []
        for curve in curves:
            xs, ys = [], []
            for i in range(1, 19):  # the original evaluates the curve again for every use of a coordinate
                if curve.evaluate(i * 0.05)[0][0] not in xs and curve.evaluate(i * 0.05)[1][0] not in ys:
                    pts.append((curve.evaluate(i * 0.05)[0][0] + rnd.randint(-5, 5),
                                curve.evaluate(i * 0.05)[1][0] + rnd.randint(-5, 5)))
                    xs.append(curve.evaluate(i * 0.05)[0][0])
                    ys.append(curve.evaluate(i * 0.05)[1][0])
        ImageDraw.Draw(mask_img).polygon(pts, fill=(0, 0, 0))
        mask_tensor = (np.asarray(mask_img).astype(np.float32) / np.float32(255.0))[None, :, :, 0]
    else:
        rect = np.zeros((H, W))
        rect[ext[1]:ext[3], ext[0]:ext[2]] = 1
        mask_tensor = 1 - np.asarray(Image.fromarray(rect), dtype=np.float32)[None]
    top, bottom, left, right = 0, H, 0, W
    if W > H:
        left_most, right_most = max(ext[2] - H, 0), min(ext[0] + H, W) - H
        if right_most > left_most:
            lft = rnd.randint(left_most, right_most)
            r = rnd.randint(0, int(0.6 * min(ext[1], ext[0] - lft, lft + H - ext[2], H - ext[3])))
            top, bottom, left, right = r, H - r, lft + r, lft + H - r
    elif W < H:
        upper_most, lower_most = max(ext[3] - W, 0), min(ext[1] + W, H) - W
        if lower_most > upper_most:
            up = rnd.randint(upper_most, lower_most)
            r = rnd.randint(0, int(0.6 * min(ext[1] - up, ext[0], W - ext[2], up + W - ext[3])))
            top, bottom, left, right = up + r, up + W - r, r, W - r

    def resize(t):  # T.Resize([512, 512]) of a CHW tensor (bilinear, no antialias)
        hwc = np.ascontiguousarray(t[:, top:bottom, left:right].transpose(1, 2, 0))
        out = cv2.resize(hwc, (RESOLUTION, RESOLUTION), interpolation=cv2.INTER_LINEAR)
        return out.reshape(RESOLUTION, RESOLUTION, -1).transpose(2, 0, 1)

    gt, mask, sk = resize(image_tensor), resize(mask_tensor), resize(sketch_tensor)
    return {"GT": gt, "inpaint_image": gt * mask, "inpaint_mask": mask, "ref_imgs": ref_tensor, "sketch": sk}


# --------------------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------------------


def samples_per_second(build, elements, samples: int, repeats: int) -> float:
    """Median over ``repeats`` of the time for ``samples`` samples (elements in turn, seed = sample number, so
    every repeat does the same work and the median only removes machine noise); one warm-up round."""
    times = []
    for rep in range(repeats + 1):
        start = time.perf_counter()
        for i in range(samples):
            build(elements[i % len(elements)], i)
        if rep:
            times.append(time.perf_counter() - start)
    return samples / statistics.median(times)


def loader_throughput(data_dir: str, workers: int, batches: int, batch_size: int = 4) -> float:
    from sketchcomp_jax.data.pipeline import make_train_loader

    it = iter(make_train_loader(data_dir, resolution=RESOLUTION, reference_size=REFERENCE_SIZE,
                                global_batch_size=batch_size, shard_index=0, shard_count=1, seed=0,
                                worker_count=workers))
    next(it)  # worker start-up and the first batch excluded
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * batch_size / (time.perf_counter() - start)


def check_reference_agrees(elements, n: int = 6) -> bool:
    """Sanity: our reference augmentation equals OpenCV's (albumentations' calls) for the same drawn parameters."""
    import cv2
    import numpy as np

    from sketchcomp_jax.data import sample_recipe as P
    from sketchcomp_jax.data.records import decode_image

    rng = np.random.default_rng(0)
    for i in range(n):
        image = decode_image(elements[i % len(elements)]["image"])
        crop = image[: image.shape[0] // 2 + 7, 5:]
        aug = P.ReferenceAugmentation.draw(rng)
        aug.angle = aug.angle if aug.angle is not None else 13.0
        aug.blur_ksize = aug.blur_ksize or 5
        ref = cv2.resize(crop, (REFERENCE_SIZE, REFERENCE_SIZE), interpolation=cv2.INTER_LINEAR)
        if aug.flip:
            ref = cv2.flip(ref, 1)
        matrix = cv2.getRotationMatrix2D((REFERENCE_SIZE / 2, REFERENCE_SIZE / 2), aug.angle, 1.0)
        ref = cv2.warpAffine(ref, matrix, (REFERENCE_SIZE,) * 2, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
        ref = cv2.blur(ref, (aug.blur_ksize,) * 2)
        aug.elastic_state = None
        if not np.array_equal(P.augment_reference(crop, REFERENCE_SIZE, aug), ref):
            return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="4 photos, 16 samples × 3 repeats, short loader run")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--samples", type=int, default=48, help="samples per timed repeat")
    parser.add_argument("--no-loader", dest="loader", action="store_false", help="skip the grain loader line")
    args = parser.parse_args()
    from absl import flags

    flags.FLAGS.mark_as_parsed()  # grain workers read absl flags
    import cv2

    from sketchcomp_jax.data.pipeline import SampleOptions, TrainSample
    from sketchcomp_jax.data.prepare import prepare_dataset

    cv2.setNumThreads(1)
    photos = PHOTOS[:4] if args.quick else PHOTOS
    samples = 16 if args.quick else args.samples
    repeats = 3 if args.quick else args.repeats

    with tempfile.TemporaryDirectory() as tmp:
        shapes = write_photos(pathlib.Path(tmp) / "photos", photos)
        t0 = time.perf_counter()
        summary = prepare_dataset(pathlib.Path(tmp) / "photos", pathlib.Path(tmp) / "data", sketcher="xdog",
                                  max_side=1024, test_fraction=0.0, progress=False)
        prep_s = time.perf_counter() - t0
        data_dir = summary.out_dir
        elements = load_elements(data_dir)

        import numpy as np

        ours_t = TrainSample(SampleOptions(resolution=RESOLUTION, reference_size=REFERENCE_SIZE))
        ours = samples_per_second(lambda e, s: ours_t.random_map(e, np.random.default_rng(s)), elements, samples, repeats)
        anchor = samples_per_second(lambda e, s: original_sample(e, random.Random(s)), elements, samples, repeats)
        agrees = check_reference_agrees(elements)

        print(f"sample construction at {RESOLUTION}² (reference {REFERENCE_SIZE}²), single process, 1 thread; "
              f"{len(elements)} scikit-image photos ({', '.join(f'{n} {h}x{w}' for n, (h, w) in shapes)}), "
              f"prepared with XDoG in {prep_s:.1f} s; median of {repeats} × {samples} samples")
        print(f"  ours   grain TrainSample (numpy/PIL + OpenCV calls)            {ours:7.2f} samples/s")
        print(f"  anchor original recipe (PIL + cv2 albumentations-style + bezier) {anchor:7.2f} samples/s")
        print(f"  reference augmentation equals OpenCV {cv2.__version__} pixel for pixel: {agrees}")
        if args.loader:
            batches = 4 if args.quick else 12
            l0 = loader_throughput(data_dir, 0, batches)
            l2 = loader_throughput(data_dir, 2, batches)
            print(f"  grain loader, batch 4: 0 workers {l0:.2f} samples/s, 2 workers {l2:.2f} samples/s "
                  f"(on {os.cpu_count()} cores)")
    print_result("data_pipeline_sample", "samples/s", ours, anchor,
                 "original danbooru.py recipe, torch-free: PIL + OpenCV (albumentations 0.4.3 ops) + bezier + scipy, "
                 "1 thread", lower_is_better=False, digits=3)


if __name__ == "__main__":
    main()
