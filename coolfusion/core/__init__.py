"""The method itself, with no torch: request types, limits and checks, word starts, chat
templates, the fusion loop, selection rules and output."""
