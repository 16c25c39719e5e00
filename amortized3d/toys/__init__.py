"""Low-dimensional experiments that isolate a distillation objective from 3D rendering."""
