"""The errors a person running ``fod`` sees: each says what failed and what to do."""


class StackError(RuntimeError):
    """A local server could not start, died, or a port it needs is taken."""


class DeploymentError(RuntimeError):
    """The model server did not come up, or did not switch to the expected version."""


class ServingError(RuntimeError):
    """The model to serve cannot be found or loaded."""
