"""The project's exception types. The CLI turns each into a one-line message and an exit code."""

from __future__ import annotations


class OptimizerError(Exception):
    """Base class for every error this project raises on purpose.

    ``report``: the run's report so far (``optimizer.report.Report``) when the error ended a run that
    had one -- the CLI still writes it (``--report``/``--json``); None otherwise.
    """

    exit_code = 2

    def __init__(self, *args, report=None):
        super().__init__(*args)
        self.report = report


class InputError(OptimizerError):
    """A user-supplied file or value is missing, malformed or unsafe (exit code 2)."""


class PipelineError(OptimizerError):
    """A pipeline text, pass name or pass option is invalid (exit code 2)."""


class OptionError(PipelineError, ValueError):
    """A pass option is invalid (exit code 2): what every pass's option check raises
    (``Pass.option_error``), from pipeline text, Python and the CLI's overrides alike. Also a
    ``ValueError``, as bad constructor arguments are in Python."""


class PassError(OptimizerError):
    r"""A pass raised, or produced an invalid model (exit code 1).

    ``pass_name`` names the failing pass and ``passes_before`` the passes that ran before it;
    ``records`` are the ``PassRecord`` objects of the passes run so far, the failing one last.
    """

    exit_code = 1

    def __init__(self, message: str, pass_name: str = "", passes_before: tuple[str, ...] = (), records=(), report=None):
        super().__init__(message, report=report)
        self.pass_name = pass_name
        self.passes_before = passes_before
        self.records = list(records)


class VerificationError(PassError):
    """A pass changed what the model computes beyond its tolerance (exit code 1); ``output_name``
    names the first output out of tolerance."""

    def __init__(
        self,
        message: str,
        pass_name: str = "",
        passes_before: tuple[str, ...] = (),
        output_name: str = "",
        records=(),
        report=None,
        metrics=(),
        detail: str = "",
    ):
        super().__init__(message, pass_name, passes_before, records, report)
        self.output_name = output_name
        #: the per-output ``OutputMetrics`` of the failed check, and its one-line summary
        self.metrics = list(metrics)
        self.detail = detail


class AccuracyError(OptimizerError):
    """The optimized model broke an accuracy bound the user set (exit code 1)."""

    exit_code = 1


class TensorRTUnavailableError(OptimizerError):
    """TensorRT-RTX (the ``tensorrt_rtx`` module) is not installed or cannot be loaded (exit code 2)."""


class EngineUnavailableError(OptimizerError):
    """TensorRT or a usable GPU is missing (exit code 2)."""
