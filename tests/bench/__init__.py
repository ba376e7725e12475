"""Tests of ``mustafar.bench`` (a package, so that module basenames may repeat in other test folders)."""
