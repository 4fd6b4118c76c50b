# Sourced by the step-time scripts (step_time_ab.sh, gpu/step_times.sh): the overrides that time a
# method in the step it spends most of its run in, after BCP's pre-training and ProtoDiff's warm-up.
#   steady_step_overrides METHOD   (a config stem such as bcp or protodiff_unet; prints 0 or 1 override)
steady_step_overrides() {
  case "${1%_unet}" in
    bcp) echo method.options.pretrain_steps=0 ;;
    protodiff) echo method.options.warmup=0 ;;
  esac
}
