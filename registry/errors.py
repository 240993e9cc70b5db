"""What the registry raises. Each is a user-facing error: the CLI prints its message and exits 2."""


class RegistryError(Exception):
    """Base class; the message is meant for the user as it is."""


class NotFound(RegistryError):
    pass


class InvalidInput(RegistryError):
    pass


class InvalidAdapter(InvalidInput):
    pass


class Conflict(RegistryError):
    pass


class Forbidden(RegistryError):
    """The actor may not do this (a protected alias); the refusal is audited."""


class ArtifactCorrupt(RegistryError):
    pass


class StoreUnavailable(RegistryError):
    """The artifact store did not answer (an object store down, unreachable, or refusing our credentials)."""


class GateRefused(RegistryError):
    def __init__(self, target: str, reasons: list[str]):
        self.reasons = reasons
        listed = "; ".join(reasons)
        super().__init__(f"promotion of {target} refused: {listed}")
