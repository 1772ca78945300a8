"""Generated protocol code: do not edit; see proto/."""
