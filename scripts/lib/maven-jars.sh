# Sourced by scripts/kafka-dev.sh and scripts/rocketmq-dev.sh: a broker's jars, resolved from
# Maven Central by Maven into a cache directory outside the repository.
#
#   jars_installed LIB                      0 when LIB holds a complete copy and java runs
#   jars_install NAME CACHE LIB G:A:V...    resolve the artifacts and their runtime
#                                           dependencies into LIB (skipped when installed);
#                                           installs Java 17 and Maven with apt when missing

need_apt() {
  local SUDO=""
  [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "$@" >/dev/null
}

jars_installed() {
  [ -f "$1/.complete" ] && command -v java >/dev/null 2>&1
}

jars_install() {
  local name=$1 cache=$2 lib=$3 deps="" gav g a v
  shift 3
  jars_installed "$lib" && return 0
  command -v java >/dev/null 2>&1 || need_apt openjdk-17-jre-headless
  command -v mvn >/dev/null 2>&1 || need_apt maven
  echo "resolving $name from Maven Central into $cache" >&2
  for gav in "$@"; do
    IFS=: read -r g a v <<<"$gav"
    deps="$deps    <dependency><groupId>$g</groupId><artifactId>$a</artifactId><version>$v</version></dependency>
"
  done
  mkdir -p "$cache"
  cat >"$cache/pom.xml" <<POM
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>lmq-gateway.test</groupId>
  <artifactId>broker-jars</artifactId>
  <version>1</version>
  <packaging>pom</packaging>
  <dependencies>
$deps  </dependencies>
</project>
POM
  rm -rf "$lib"
  # (Debian's Maven 3.8 prints colour resets even with -B -q: dropped.)
  mvn -q -B -f "$cache/pom.xml" dependency:copy-dependencies -DincludeScope=runtime -DoutputDirectory="$lib" 2>&1 |
    sed 's/\x1b\[0m//g' >&2
  touch "$lib/.complete"
}
