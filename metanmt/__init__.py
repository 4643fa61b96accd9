"""metanmt: meta-learn the initialization of a translation model across many source languages."""

__version__ = "0.1.0"
