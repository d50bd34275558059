"""What a checkpoint file holds: trainer families and their copies, containers, formats."""
