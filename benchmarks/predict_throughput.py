"""Predict throughput (images/s): PyTorch (the `histotoken predict` path) against onnxruntime, side by side.

For each model (default resnet18 and deit_small_patch16_224 at 224 px, untrained weights: speed does
not depend on them) the same uint8 images are scored two ways, in turns over several rounds in one
process, and the median of the rounds is reported:

- ``pytorch``: :func:`histotoken.engine.inference.predict_logits`, as `histotoken predict` runs it
  (Lightning predict loop, one Trainer per call as in the command, normalisation on the device,
  the precision picked for this CPU unless
  ``--precision`` says otherwise; bf16 autocast where the CPU has AMX/AVX-512 BF16, fp32 elsewhere);
- ``onnxruntime``: the model exported by ``histotoken export --format onnx`` (fp32), run by an
  onnxruntime CPU session with the same number of threads, normalisation included in the timing.

    python benchmarks/predict_throughput.py                       # 224 px, 64 images, 5 rounds
    python benchmarks/predict_throughput.py --threads 2           # the 2-core figure of the issue
    python benchmarks/predict_throughput.py --img-size 64 --images 8 --rounds 1   # smoke run
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["resnet18", "deit_small_patch16_224"])
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--images", type=int, default=64, help="images scored per measurement")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for both (default: torch's)")
    parser.add_argument("--precision", default="auto", help="PyTorch precision (auto, 32-true, bf16-mixed)")
    return parser.parse_args()


class _Images(torch.utils.data.Dataset):
    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        return self.images[index], 0


def main() -> None:
    args = parse_args()
    import onnxruntime

    import histotoken  # noqa: F401  (registers our families)
    from histotoken.cli.main import configure_logging
    from histotoken.data.transforms import model_normalisation
    from histotoken.engine.environment import cpu_model
    from histotoken.engine.export import export_onnx
    from histotoken.engine.inference import predict_logits
    from histotoken.engine.precision import resolve_precision
    from histotoken.models.factory import create_model

    configure_logging(verbose=False)  # Lightning's start-up chatter off, as in the CLI
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    precision = resolve_precision(args.precision, "cpu", args.img_size)
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.images, 3, args.img_size, args.img_size), dtype=torch.uint8, generator=generator)
    workdir = Path(tempfile.mkdtemp(prefix="predict-throughput-"))

    runners = {}
    for name in args.models:
        torch.manual_seed(0)
        model = create_model(name, 2, args.img_size).eval()
        mean, std = model_normalisation(model)
        onnx_path = workdir / f"{name}.onnx"
        example = torch.randn(2, 3, args.img_size, args.img_size)
        export_onnx(model, onnx_path, example)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        session = onnxruntime.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        mean_np = np.asarray(mean, dtype=np.float32).reshape(1, -1, 1, 1)
        std_np = np.asarray(std, dtype=np.float32).reshape(1, -1, 1, 1)

        def run_pytorch(model=model, mean=mean, std=std) -> None:
            predict_logits(model, _Images(images), mean=mean, std=std, batch_size=args.batch_size,
                           accelerator="cpu", precision=precision)

        def run_onnx(session=session, mean_np=mean_np, std_np=std_np) -> None:
            array = images.numpy()
            for start in range(0, len(array), args.batch_size):
                batch = (array[start : start + args.batch_size].astype(np.float32) / 255.0 - mean_np) / std_np
                session.run(None, {"images": batch})

        runners[(name, "pytorch")] = run_pytorch
        runners[(name, "onnxruntime")] = run_onnx

    for run in runners.values():  # warm-up: first calls allocate and pick kernels
        run()
    seconds: dict[tuple[str, str], list[float]] = {key: [] for key in runners}
    for _ in range(args.rounds):  # interleaved: every runner once per round
        for key, run in runners.items():
            start = time.perf_counter()
            run()
            seconds[key].append(time.perf_counter() - start)

    print(f"CPU: {cpu_model()}, {threads} threads; torch {torch.__version__}, onnxruntime {onnxruntime.__version__}")
    print(f"{args.images} images at {args.img_size} px, batch {args.batch_size}, median of {args.rounds} interleaved rounds")
    print(f"precision: pytorch {precision} (predict_logits), onnxruntime fp32")
    print(f"{'model':<28}{'pytorch img/s':>16}{'onnxruntime img/s':>20}{'ratio ort/pt':>14}")
    for name in args.models:
        pt = args.images / statistics.median(seconds[(name, "pytorch")])
        ort = args.images / statistics.median(seconds[(name, "onnxruntime")])
        print(f"{name:<28}{pt:>16.1f}{ort:>20.1f}{ort / pt:>14.2f}")


if __name__ == "__main__":
    main()
