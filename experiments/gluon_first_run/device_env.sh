# Sourced by this folder's run scripts on the device: install the carried wheels (.whl/) into .whl/site
# and put them and the repository on the path.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target .whl/site .whl/*.whl
export PYTHONPATH=$PWD/.whl/site:$PWD
export PYTHONUNBUFFERED=1
