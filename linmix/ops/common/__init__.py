"""Pieces shared by the op families: input checks, varlen packing, chunk layout, state passing."""
