"""Lightning callbacks: validation render grids to disk and to the active logger."""
from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np

from amortized3d.checkpoint_io import atomic_write


class ValidationRenderWriter(L.Callback):
    """Writes the system's last validation grid to ``output_dir/step_XXXXXX.png`` and logs it."""

    def __init__(self, output_dir: str):
        self.output_dir = Path(output_dir)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        images = getattr(pl_module, "val_images", None)
        if not trainer.is_global_zero or not images:
            return
        import imageio.v3 as iio

        array = (images[0].permute(1, 2, 0).detach().cpu().numpy() * 255).round().astype(np.uint8)
        path = self.output_dir / f"step_{trainer.global_step:06d}.png"
        atomic_write(path, lambda f: iio.imwrite(f, array, extension=".png"))
        for logger in trainer.loggers:
            if type(logger).__name__ == "WandbLogger":
                logger.log_image(key="val/renders", images=[array], step=trainer.global_step)
