"""The project's exception types. The CLI turns each into a one-line message and an exit code."""

from __future__ import annotations


class OptimizerError(Exception):
    """Base class for every error this project raises on purpose."""

    exit_code = 2


class InputError(OptimizerError):
    """A user-supplied file or value is missing, malformed or unsafe (exit code 2)."""


class PipelineError(OptimizerError):
    """A pipeline text, pass name or pass option is invalid (exit code 2)."""


class PassError(OptimizerError):
    """A pass raised, or produced an invalid model (exit code 1).

    ``pass_name`` names the failing pass and ``passes_before`` the passes that ran before it.
    """

    exit_code = 1

    def __init__(self, message: str, pass_name: str = "", passes_before: tuple[str, ...] = ()):
        super().__init__(message)
        self.pass_name = pass_name
        self.passes_before = passes_before


class VerificationError(PassError):
    """A pass changed what the model computes beyond its tolerance (exit code 1)."""

    def __init__(
        self,
        message: str,
        pass_name: str = "",
        passes_before: tuple[str, ...] = (),
        output_name: str = "",
    ):
        super().__init__(message, pass_name, passes_before)
        self.output_name = output_name


class AccuracyError(OptimizerError):
    """The optimized model broke an accuracy bound the user set (exit code 1)."""

    exit_code = 1
