"""Pipeline parallelism across an H-Net's chunk levels: a V-shaped schedule over per-stage ZeRO-3 engines."""
from .executor import PipelineStep
from .grid import PipelineGrid
from .schedule import SCHEDULES, build_schedule, simulate, theoretical_bubble
from .stage import PipelineStage, split_levels

__all__ = ["PipelineGrid", "PipelineStage", "PipelineStep", "SCHEDULES", "build_schedule", "simulate",
           "split_levels", "theoretical_bubble"]
