# Makes conf/ a package (installed as raee.conf through the raee/conf link) so that setuptools ships
# its YAML files inside the wheel; nothing to import here.
