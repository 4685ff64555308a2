"""Jobs to scores: decode, preprocess, model sessions, inference and the decide-and-store rules."""
