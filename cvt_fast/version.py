"""The package's version, in one place: pyproject.toml reads it from here, the package exports it, and every frozen
package records it."""

__version__ = "0.1.0"
