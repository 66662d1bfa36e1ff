"""SEVIR nowcasting pipeline: the DVC stages and the library they share."""
