"""The two ways an export can fail: its input is unusable, or the export itself failed."""


class ExportInputError(ValueError):
    """The input of an export is unusable.

    A missing or corrupt model file, an unknown format, a missing data folder, an output
    directory that already holds the version. The message is one line that names it.
    """


class ExportError(RuntimeError):
    """An export failed: a conversion error or an op that is not a TFLite builtin.

    The message is one line that names the file or format concerned.
    """
