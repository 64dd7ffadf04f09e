"""Task-level hemorrhage: multiple-choice and last-word accuracy of both models (:mod:`.scoring`), and the answers
that flip between them (:mod:`.flips`)."""
