"""The method itself: truncation math, the KaSA layer, its initialization and regularizer; no placement, no format."""
