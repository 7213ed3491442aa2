"""The stack's topic names, each in one place.

Names are relative, so they resolve in the namespace the stack is started in and follow remapping (``ros2
launch``'s ``remappings``, ``--ros-args -r joint_states:=/my_arm/joint_states``) on every node, the policy
node's control path included. Types and who publishes what:

  joint_states           sensor_msgs/JointState           robot (sim, bridge) -> ingest          feedback rate
  task/target            geometry_msgs/PointStamped       robot -> ingest (latched)              per episode
  task/pillar            geometry_msgs/PointStamped       robot -> ingest (latched)              per episode
  task/episode           std_msgs/Header                  robot -> ingests, policy (latched)     per episode
                         stamp = the episode's start, frame_id = episode_<id>, sent one reset delay ahead
  task/episode_result    std_msgs/String (JSON)           robot -> anyone
  camera/image_raw       sensor_msgs/Image (rgb8)         sim -> camera ingest                   camera rate
  policy/observation     trajectory_msgs/JointTrajectory  ingest -> policy, teacher              policy rate
  policy/image_observation sensor_msgs/Image (32FC3)      camera ingest -> policy                policy rate
  policy/action_chunk    trajectory_msgs/JointTrajectory  policy -> robot (no points = hold)     policy rate
  teacher/action_chunk   trajectory_msgs/JointTrajectory  teacher -> policy
  policy/mode            std_msgs/String (latched)        policy -> teacher, anyone
  /diagnostics           diagnostic_msgs/DiagnosticArray  every node, 1 Hz (absolute, as ROS tools expect)

The message layouts (observation and chunk conventions) are described in :mod:`koopman_control.ros.convert`.
"""

JOINT_STATES = "joint_states"
TARGET = "task/target"
PILLAR = "task/pillar"
EPISODE = "task/episode"
EPISODE_RESULT = "task/episode_result"
CAMERA = "camera/image_raw"
OBSERVATION = "policy/observation"
IMAGE_OBSERVATION = "policy/image_observation"
ACTION_CHUNK = "policy/action_chunk"
TEACHER_CHUNK = "teacher/action_chunk"
MODE = "policy/mode"
DIAGNOSTICS = "/diagnostics"
