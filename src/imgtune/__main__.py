from imgtune.cli import run

run()
