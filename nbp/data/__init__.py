"""Data: generated datasets (moving_digits), grain pipelines (pipeline), and readers
of pod-scale data (video_folder, tfds_video). Import the submodules directly."""
