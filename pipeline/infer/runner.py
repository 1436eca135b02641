"""How a network runs on its device: the backend (torch | onnxruntime | openvino, fp32 | int8), the CPU-fused copy of our U-Net,
float16 autocast on CUDA, and how many windows go into one network call."""

from __future__ import annotations

import logging
from typing import Optional

import torch

from pipeline.config import Config
from pipeline.infer.sliding import network_margin, window_forward
from pipeline.infer.windows import WindowGrid

log = logging.getLogger(__name__)

__all__ = ["NetworkRunner"]


class NetworkRunner:
    """One network on one device; :meth:`forward` (built at the first call) maps windows to logits.

    ``backend``: ``auto | torch | onnxruntime | openvino`` asked for (default: ``inference.backend``); the one
    chosen is :attr:`backend` once :meth:`forward` has been built.
    """

    def __init__(self, network: torch.nn.Module, config: Config, device: torch.device, model_sha256: str = "",
                 backend: Optional[str] = None):
        self.network, self.config, self.device = network, config, device
        self.model_sha256 = model_sha256
        self.backend_requested = backend or config.inference.backend
        self.backend: Optional[str] = None  # torch | onnxruntime | openvino, once chosen
        self.precision: Optional[str] = None  # fp32 | int8, once chosen
        self._forward = None

    @property
    def window_batch(self) -> int:
        """Windows per network call: at least 2 on a CPU, where batch-1 3D convolutions are slow."""
        batch = self.config.inference.sw_batch_size
        return max(batch, 2) if self.device.type == "cpu" else batch

    def forward(self, image: Optional[torch.Tensor] = None):
        """The callable that maps a batch of windows (B, channels, *roi) to logits, built once.

        * CUDA: the network under ``inference_mode``, float16 autocast (``inference.amp``), cuDNN autotuning.
        * CPU, torch: the fused channels-last copy of our U-Net (:mod:`pipeline.model.fused`), float32 (no
          CPU autocast: without hardware bf16 it is 100x slower).
        * CPU, onnxruntime: the network exported to ONNX once per checkpoint (cached), run by ONNX Runtime.
        * CPU, openvino: the same export converted to OpenVINO IR (cached), compiled for the CPU.
        * ``inference.precision: int8``: the export's static QDQ int8 quantisation (:mod:`pipeline.infer.quantize`)
          on onnxruntime or openvino.
        ``inference.backend: auto`` keeps the backends whose masks agree with torch fp32 on the calibration
        windows and the fastest of them (:mod:`pipeline.infer.auto`; remembered per machine).
        ``image``: the preprocessed case about to be segmented (C, *spatial): the calibration windows come
        from it when the checkpoint's training data is not readable (not kept).
        """
        if self._forward is not None:
            return self._forward
        from pipeline.infer.backend import make_predictor, select_runtime
        from pipeline.model.fused import fuse_for_inference

        cfg = self.config.inference
        device = self.device
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        fast = fuse_for_inference(self.network, device)
        amp = cfg.amp and device.type == "cuda"  # float16: more mantissa than bf16, and every CUDA GPU has it
        amp_dtype = torch.float16

        def torch_forward(x: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode(), torch.autocast(device.type, dtype=amp_dtype, enabled=amp):
                if device.type == "cpu" and x.shape[0] == 1:  # one window: batch 2 keeps oneDNN's kernels
                    return fast(torch.cat([x, x]))[:1].float()
                return fast(x).float()

        roi = list(cfg.roi_size)
        input_shape = (self.config.in_channels, *roi)
        calibration = self._calibration(image, device)
        timed = window_forward(torch_forward, len(roi))
        built: dict = {}  # auto's chosen predictor, when it built one (not compiled twice)
        self.backend, self.precision = select_runtime(
            self.backend_requested, self.network, device, self.model_sha256, input_shape, self.window_batch,
            torch_forward=timed, precision=cfg.precision, calibration=calibration, threshold=cfg.threshold,
            built=built)
        if self.backend == "torch":
            self._forward = torch_forward
        else:
            predictor = built.get((self.backend, self.precision)) or make_predictor(
                self.backend, self.precision, self.network, self.model_sha256, input_shape, self.window_batch,
                calibration)
            self._forward = lambda x: predictor(x.cpu()).to(device)
        log.info("inference backend: %s %s on %s", self.backend, self.precision, device)
        return self._forward

    def _calibration(self, image, device: torch.device):
        """Calibration windows (:mod:`pipeline.infer.calibration`) where int8 or ``auto`` can need them."""
        cfg = self.config.inference
        if device.type != "cpu" or not self.model_sha256:
            return None
        if cfg.precision != "int8" and self.backend_requested != "auto":
            return None
        from pipeline.infer.calibration import calibration_for

        return calibration_for(self.config, image)

    def valid_padding(self) -> bool:
        """Whether the network shrinks its input (valid convolutions): then MONAI's sliding window runs
        over a padded volume instead of the streamed windows."""
        cfg = self.config.inference
        return any(network_margin(self.network, cfg.roi_size, self.config.model.spatial_dims))

    def tile_batches(self, spatial: tuple) -> Optional[int]:
        """How many network calls a preprocessed grid of shape ``spatial`` takes, if known."""
        cfg = self.config.inference
        if self.valid_padding():
            return None  # valid-padding networks tile a padded volume
        roi = list(cfg.roi_size) + ([1] if self.config.model.spatial_dims == 2 else [])
        windows = len(WindowGrid(tuple(spatial), tuple(roi), cfg.overlap))
        return -(-windows // self.window_batch)
