"""Errors that speak to users: one sentence that says what went wrong and what to do."""


class UserError(Exception):
    """A problem the user can fix. `str(err)` is shown as is, without a traceback."""


class UnsafeNameError(UserError):
    """A name or path that would leave its folder or clobber something."""


class ModelLoadError(UserError):
    """A base model that is missing, truncated, of an unsupported kind or unsafe to load."""


class DatasetError(UserError):
    """A dataset that cannot be trained on (no images, bad layout...)."""


class Cancelled(Exception):
    """Raised by a step when its progress object reports cancellation."""
