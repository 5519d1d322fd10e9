"""Errors that jobs report to the user as one clear message instead of a traceback."""


class UserError(Exception):
    """A problem the user can fix: bad options, bad data root, bad model file."""


class ConfigError(UserError):
    """An invalid option value; raised before any work starts."""


class DataError(UserError):
    """The data root cannot be used as given (missing, empty, mismatched classes...)."""


class WeightsError(UserError):
    """Weights could not be fetched, verified or loaded safely."""


class OutputError(UserError):
    """The output location is unusable (held by another run, holds other results...)."""


class TrackingError(UserError):
    """The MLflow tracking store named by --mlflow-uri cannot be used."""
