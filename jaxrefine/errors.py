"""Errors raised by jaxrefine.  Messages name the file, what is wrong and what to do."""


class JaxrefineError(Exception):
    """Base class of every error jaxrefine raises on purpose."""


class InputError(JaxrefineError):
    """A file is missing, unreadable or lacks something jaxrefine needs."""


class DataMismatchError(JaxrefineError):
    """Model and reflections disagree (cell, space group)."""


class SelectionError(JaxrefineError):
    """A selection string is malformed or selects nothing."""


class RestraintError(JaxrefineError):
    """A residue or ligand has no restraint dictionary, or the topology failed."""


class ConfigError(JaxrefineError):
    """A configuration key or value is not valid."""
