"""The shared layout every byte store gets: packing items into data files, and reading them back."""
