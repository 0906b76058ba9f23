# Runtime environment of mace's venv. Source it from bash: `. scripts/env.sh`.
# The ROS 2 packages, the generated interfaces and mace itself are all installed into .venv, so
# this is all ROS needs: no /opt/ros setup file, no PYTHONPATH, no LD_LIBRARY_PATH (the
# ros-wheels bootstrapper in the venv sets that when Python starts).

MACE_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export MACE_ROOT
export VIRTUAL_ENV="$MACE_ROOT/.venv"
case ":$PATH:" in
  *":$VIRTUAL_ENV/bin:"*) ;;
  *) export PATH="$VIRTUAL_ENV/bin:$PATH" ;;
esac

# ament index (get_package_share_directory, rmw and typesupport lookup) and CMake builds.
export AMENT_PREFIX_PATH="$VIRTUAL_ENV"
export CMAKE_PREFIX_PATH="$VIRTUAL_ENV"

# FastDDS is the only RMW in the venv; keep discovery on this machine. ROS_DOMAIN_ID is left to
# the caller (`make test` picks one per run).
export RMW_IMPLEMENTATION="${RMW_IMPLEMENTATION:-rmw_fastrtps_cpp}"
export ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST
