"""Model families: loading, converting and saving SD 1.x/2.x components."""
