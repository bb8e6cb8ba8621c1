"""dcopt: learn layer widths while training, then export a smaller plain PyTorch model.

Public API: :func:`analyze`, :func:`convert`, :func:`export`, :func:`save_exported`,
:func:`reorder_by_importance`,
:func:`fit` (with :class:`ToleranceController` for tolerance mode, :func:`land_on_budget` for
budget mode in your own loop), :func:`count_macs`,
:func:`register_rule` and the exceptions.
"""
from . import counting  # noqa: F401  (dcopt.counting.flop_counter)
from .errors import ConversionError, DcoptError, ExportError, TraceError, TraceRefusal, UnsupportedOpError
from .rules import register_rule
from .analysis import Analysis, analyze

__all__ = [
    "Analysis", "analyze", "register_rule",
    "DcoptError", "TraceError", "TraceRefusal", "ConversionError", "UnsupportedOpError", "ExportError",
]
from .config import Config
from .rewrite import DynamicModel, SizeInfo, convert
from .export import export

__all__ += ["Config", "DynamicModel", "SizeInfo", "convert", "export"]
from .save import load_exported, save_exported

__all__ += ["save_exported", "load_exported"]
from .report import count_macs, export_report, render_export_report

__all__ += ["count_macs", "export_report", "render_export_report"]
from .train import History, fit

__all__ += ["fit", "History"]
from .tolerance import ToleranceController

__all__ += ["ToleranceController"]
from .budget import BudgetLanding, land_on_budget

__all__ += ["BudgetLanding", "land_on_budget"]
from .ordering import spread_order, spread_reach

__all__ += ["spread_order", "spread_reach"]
from .reorder import ReorderError, reorder_by_importance

__all__ += ["ReorderError", "reorder_by_importance"]
